"""The cluster mode's etcd side: the client, leader election and server membership."""
