"""Methods that are more than a collector, one file each, to hold against its paper."""
