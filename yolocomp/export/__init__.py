"""yolocomp.export"""
