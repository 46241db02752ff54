"""data/dedup"""
