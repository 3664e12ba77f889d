class ClusterExecutor: pass
