"""inkwash.data"""
