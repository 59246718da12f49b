#!/usr/bin/env bash
# Start every server the tests need (Redis, PostgreSQL, RabbitMQ) on loopback if it is not
# already answering. Safe to run repeatedly.
set -u

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port name seconds
  for _ in $(seq 1 "$3"); do listening "$1" && return 0; sleep 1; done
  echo "ensure-services: $2 is not listening on 127.0.0.1:$1" >&2
  return 1
}

status=0
if ! listening 6379 && command -v redis-server >/dev/null; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for 6379 redis 20 || status=1

if ! listening 5432 && command -v pg_ctlcluster >/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
wait_for 5432 postgresql 30 || status=1

if ! listening 5672 && command -v rabbitmq-server >/dev/null; then
  rabbitmq-server -detached
fi
wait_for 5672 rabbitmq 60 || status=1

exit $status
