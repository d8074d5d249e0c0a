"""``mmbalance evaluate``: bias and quality of a trained CLIP/SigLIP checkpoint on a labelled
evaluation set (docs/algorithms.md section 9).

  * ``metrics``: the figures as plain numpy functions of predictions, rankings and per-image weights
    (one row of ones for the figure, one row per bootstrap replicate for its interval);
  * ``scoring``: prompts -> class embeddings (the zero-shot tagger's ensembles and scoring) and the
    zero-shot predictions;
  * ``figures``: every figure of one evaluation with its bootstrap interval, as evaluate.json;
  * ``render``: the terminal table and evaluate.html.

The forward pass is the embed stage's (``mmbalance.pipeline.evaluate`` runs it).
"""
