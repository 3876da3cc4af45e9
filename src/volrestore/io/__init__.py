"""Images on disk: OME-Zarr NGFF 0.4/0.5 metadata, reading and writing (ngff), pyramids, TIFF conversion, viewers."""
