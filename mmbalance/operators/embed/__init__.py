"""Image and caption embeddings from an open_clip model (or DataComp .npz files: ``precomputed``).

    model        load_model -> ModelBundle (the model, tokenizer, preprocessing, the record of what loaded)
    images       bytes -> RGB PIL image -> open_clip's geometry, every failure a one-line reason
    gpu_decode   the batched nvJPEG + tensor-resize path on CUDA
    stage        embed_table / embed_shard (the embed stage's operator) and check_shard (validation)

Image bytes come through ``mmbalance.io.images.ImageSource``, as every reader of images does.
"""
