"""Stage 1: raw text -> clean documents."""
