-- One database per service (DESIGN.md: no service reads another's database).
CREATE DATABASE invoice;
CREATE DATABASE payments;
CREATE DATABASE subscriptions;
CREATE DATABASE notifications;
CREATE DATABASE reporting;
CREATE DATABASE gateway;
