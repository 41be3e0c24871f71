"""inkwash.train"""
