"""Running tiles: model host, Ray runtime, work dir, run summary, the run skeleton."""
