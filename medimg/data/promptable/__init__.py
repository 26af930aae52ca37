"""Promptable-model data: prompt simulation, 2D slice and 3D patch datasets with their DataModules."""
