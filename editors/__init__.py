"""Knowledge editors (MultEdit, VisEdit, the fine-tuning baseline) and edit metrics.

Depends only on ``vlm``; knows nothing about gRPC or MLflow. Built by the
MultEdit and VisEdit issues.
"""
