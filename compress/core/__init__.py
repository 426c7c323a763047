"""The ground floor: errors, the config schema, registries, bounded storage, memory and
process helpers, statistics. Nothing here knows of models, datasets, stages or runs, and
nothing here imports from the folders above."""
