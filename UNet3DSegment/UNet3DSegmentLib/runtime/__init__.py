"""Runtime layer: CPU facts, Keras backend choice and set-up, per-backend forward passes, precision, out-of-memory fallback."""
