"""What a recipe can name: its typed sections (recipe), networks by name (architectures)
and tasks (loss, metric, distillation loss, paired interval)."""
