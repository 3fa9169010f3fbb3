"""expert_nodes"""
