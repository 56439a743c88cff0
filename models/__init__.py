"""Models: ViT and MED, the task models assembled from them, their objectives and checkpoint layout."""
