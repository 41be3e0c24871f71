"""inkwash.formats"""
