"""inkwash.text"""
