"""Grid and geometry work: tiles, vectorizing, stitching, regularizing."""
