"""inkwash.sampling"""
