"""mmbalance: rebalance large image-text corpora before CLIP/SigLIP pretraining."""

__version__ = "0.1.0"
