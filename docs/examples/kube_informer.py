"""The informer fragments of docs/kube.md and the README, completed into one program.

It reads the cluster from your kubeconfig (``$KUBECONFIG``, else ``~/.kube/config``),
as the official client does, and lists the pods of namespace ``prod``. The docs
tests run it against fanout's loopback API server.
"""

import os

import fanout
from fanout.kube import Informer
from fanout.kube.metrics import InformerCollector
from fanout.metrics import serve


class PodHandler(fanout.Handler):  # module-level: it is pickled to workers
    def on_add(self, pod, is_in_initial_list):
        print("add", pod["metadata"]["name"])


def slim(pod):
    return {
        "metadata": {k: pod["metadata"][k] for k in ("name", "namespace", "labels")},
        "spec": {"nodeName": pod["spec"].get("nodeName")},
        "status": {"phase": pod["status"].get("phase")},
    }


def more_informers(d):
    """Informers of other resources, made (not started) as docs/kube.md shows them."""
    Informer(d, "nodes")  # cluster-scoped
    Informer(d, "deployments", group="apps", namespace="prod")
    Informer(d, "widgets", group="example.com", version="v1alpha1")  # a custom resource
    Informer(d, "pods", label_selector="app=web", field_selector="spec.nodeName=node-1")

    inf = Informer(
        d,
        "pods",
        indexers={
            "node": lambda pod: [pod["spec"].get("nodeName", "")],
            "owner": lambda pod: [o["uid"] for o in pod["metadata"].get("ownerReferences", [])],
        },
    )
    inf.store.by_index("node", "node-1")

    Informer(d, "pods", transform=slim)


def another_config(d, path, context=None):
    """An informer whose client comes from another kubeconfig file or context."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=path, context=context)
    Informer(d, "pods", api_client=api)
    api.close()  # the informer was not started: nothing else holds the client


def metrics(d, port=0):
    """Serve the distributor's and two informers' metrics; return the endpoint."""
    pods, nodes = Informer(d, "pods"), Informer(d, "nodes")
    server = serve(d, port)
    server.registry.register(InformerCollector(pods, nodes))
    return server


if __name__ == "__main__":
    with fanout.Distributor() as d:
        d.add_listener(PodHandler(), workers=4)
        with Informer(d, "pods", namespace="prod", transform=slim) as inf:
            inf.wait_synced()
            print(len(inf.store), "pods in prod")
            ...
        more_informers(d)
        another_config(d, os.environ.get("KUBECONFIG", "~/.kube/config"))
        with metrics(d) as server:
            print("metrics at", server.url)
