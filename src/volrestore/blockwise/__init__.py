"""Blockwise execution: the fixed tile grid, write-blocks with explicit read/write boxes, the one Dask runner, restore."""
