"""A handler module the Ray actors import (docs/ray.md: ``from pods import Indexer``)."""

import fanout


class Indexer(fanout.Handler):
    def on_add(self, obj, is_in_initial_list):
        print("indexed", obj["metadata"]["name"])

    def on_update(self, old, new):
        print("reindexed", new["metadata"]["name"])
