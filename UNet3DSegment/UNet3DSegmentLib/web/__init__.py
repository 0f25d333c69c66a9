"""Web layer: the trame-slicer browser front end on the same MRML logic as the Slicer module."""
