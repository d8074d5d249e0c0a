"""Clustering (docs/algorithms.md sections 2, 3, 5): fit on a bounded sample, assign every row.

One job a module; everything works on unit-norm float32 vectors, where cosine similarity is the
inner product, and imports faiss only where it searches or fits:

    vectors    which embedding is clustered (image, text, or their normalised mean)
    sampling   exact, mergeable bottom-k samples by uid priority (overall or capped per stratum)
    index      the nearest-centroid search (flat, exact; on a GPU when faiss sees one), hierarchy levels
    kmeans     spherical k-means with faiss (restarts, split-and-merge, two levels at large k)
    select_k   R&B Regroup's choice of k by the cosine silhouette
    sbcl       SBCL subclasses inside each class
"""
