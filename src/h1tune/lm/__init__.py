"""What one causal-LM step is made of, shared by training, evaluation and the adapter probe.

loss.py: the one shifted cross-entropy (and its chunked form, token-weighted sums); batching.py: padded
or packed batches and the probe's windows. Below `train/` and `evaluation/` so neither imports the other
for its numerics (the structure test holds it).
"""
