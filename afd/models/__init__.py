"""afd/models"""
