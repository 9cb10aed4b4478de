"""Models: registry and weights, backends, CPU mask decoders, the text detector."""
