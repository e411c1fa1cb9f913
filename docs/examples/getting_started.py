"""The fragments of docs/getting-started.md, completed: a factory, FuncHandler, an initial list.

Run it with ``python docs/examples/getting_started.py``.
"""

import fanout


class Connection:
    """Stands in for a client that cannot be pickled (a socket, a database session)."""

    def send(self, obj):
        print("exported", obj["metadata"]["name"])


def open_connection():
    return Connection()


class Exporter(fanout.Handler):
    def __init__(self):
        self.session = open_connection()  # runs in each worker

    def on_update(self, old, new):
        self.session.send(new)


def on_update(old, new):
    print(new["metadata"]["name"])


class Printer(fanout.Handler):
    def on_add(self, obj, is_in_initial_list):
        print("added", obj["metadata"]["name"], "(initial list)" if is_in_initial_list else "")


if __name__ == "__main__":
    current_objects = [{"metadata": {"name": f"web-{i}"}} for i in range(3)]
    with fanout.Distributor() as d:
        d.add_listener(Exporter, workers=4)
        d.add_listener(fanout.FuncHandler(on_update=on_update))
        reg = d.add_listener(Printer(), initial_list=current_objects)
        d.mark_synced()
        reg.wait_synced(timeout=30)  # True once every initial-list add was handled
        assert reg.has_synced()
        d.distribute(fanout.Update(current_objects[0], current_objects[0]))
