"""Two-tower text matching model: item tower (transformer) + user tower (attention pooling)."""
