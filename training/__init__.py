"""msk-node research framework: datasets, detector and segmenter training, export to the node."""
