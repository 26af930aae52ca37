"""Manifests, MONAI transform pipelines, embedded datasets, prompt simulation and LightningDataModules."""
