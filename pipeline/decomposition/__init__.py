"""Decomposition at scale: PCA, single-subject and group ICA, dual regression."""
