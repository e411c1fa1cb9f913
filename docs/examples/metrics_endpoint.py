"""docs/observability.md's fragments, completed: the metrics endpoint and the collector.

Run it with ``python docs/examples/metrics_endpoint.py``.
"""

import urllib.request

from prometheus_client import REGISTRY

import fanout
import fanout.metrics
from fanout.metrics import PrometheusCollector


class MyHandler(fanout.Handler):
    def on_add(self, obj, is_in_initial_list):
        pass


if __name__ == "__main__":
    port = 0  # 0: any free port; a service would pick one, say 9100
    d = fanout.Distributor()
    d.add_listener(MyHandler, name="pods")
    d.start()
    server = fanout.metrics.serve(d, port)  # port 9100: http://127.0.0.1:9100/metrics
    d.distribute(fanout.Add({"metadata": {"name": "web-1"}}))
    with urllib.request.urlopen(server.url, timeout=30) as response:
        text = response.read().decode()
    assert 'fanout_received_total{listener="pods"} 1.0' in text, text
    server.close()  # or: with fanout.metrics.serve(...) as server:
    REGISTRY.register(PrometheusCollector(d))
    d.stop(drain=True)
