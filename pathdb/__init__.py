"""pathdb."""
