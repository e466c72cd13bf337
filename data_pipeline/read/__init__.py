"""Reading prepared shards: the shard table, the global order, packed batches or chat rows,
prefetching remote shards, and the loaders behind `data_pipeline.build_loader`."""
