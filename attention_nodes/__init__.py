"""attention_nodes"""
