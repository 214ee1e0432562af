"""Datasets: annotation files, generated scenes, transforms, in-memory splits."""
