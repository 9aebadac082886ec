"""K3s integration: the static manifests and the EndpointSlice registrar.

``render`` turns the config into the cluster-wide objects (applied by K3s from its manifests
directory on server nodes); ``registrar`` keeps this node's EndpointSlice in step with its
health; ``credentials`` reads the kubeconfig or service-account token the registrar uses.
"""
