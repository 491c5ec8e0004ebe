"""gen_objectives."""
