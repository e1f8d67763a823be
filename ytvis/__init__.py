"""ytvis"""
