"""The producer's core: the distributor, its delivery plan, its lifecycle, its options."""
