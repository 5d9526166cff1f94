"""Sources of image-instruction samples: LLaVA JSON + image folder, WebDataset shards, the built-in synthetic set;
image decoding and conversation templates."""
