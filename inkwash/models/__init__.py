"""inkwash.models"""
