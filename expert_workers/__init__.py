"""expert_workers"""
