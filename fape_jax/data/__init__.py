"""Data: degradation synthesis, the embedded corpus, the pairs store (TFDS) and the Grain pipeline.

  degrade.py   seeded synthesis of the seven degradations and the CDD-11 mixes (the recipes)
  kernels.py   the blur kernels and image operations those recipes use
  corpus.py    natural photos bundled with Python packages and Debian wallpapers, split by image
  images.py    reading image files into uint8 RGB with documented conversions and clear errors
  builders.py  TFDS builders (ArrayRecord): the synthetic store and real benchmark folders
  pairs.py     prepare_synthetic / prepare_folder / open_pairs: what training calls
  pipeline.py  Grain train/eval pipelines joined with the plan store, per-host sharding
"""
