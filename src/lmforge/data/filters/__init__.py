"""data/filters"""
