"""vlp-shard: captioned images in, webdataset shards out."""
