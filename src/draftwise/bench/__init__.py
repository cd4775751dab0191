"""draftwise bench: speed and exactness of methods against plain decoding, in one run."""
