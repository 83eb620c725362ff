package dev.sidetrack.interop;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.stream.Collectors;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.core.DefaultKafkaProducerFactory;
import org.springframework.kafka.core.KafkaTemplate;
import org.springframework.kafka.listener.ContainerProperties;
import org.springframework.kafka.listener.DeadLetterPublishingRecoverer;
import org.springframework.kafka.listener.DefaultErrorHandler;
import org.springframework.kafka.listener.KafkaMessageListenerContainer;
import org.springframework.kafka.listener.MessageListener;
import org.springframework.kafka.listener.RetryListener;
import org.springframework.kafka.listener.ListenerExecutionFailedException;
import org.springframework.util.backoff.FixedBackOff;

/**
 * The Java side of sidetrack's interop tests (tests/interop.rs drives it; the assertions live
 * there). Subcommands print JSON on stdout, one document; logs go to stderr.
 *
 * <ul>
 *   <li>{@code consume BOOTSTRAP TOPIC read_committed|read_uncommitted}: a plain
 *       {@link KafkaConsumer} (no group, every partition from the beginning up to the end offsets
 *       as they were when it started) prints every record: key, value and header values as hex,
 *       timestamp and its type.</li>
 *   <li>{@code spring-dlt BOOTSTRAP TOPIC GROUP plain|tx-commit|tx-abort TAG}: produces a few
 *       records to TOPIC (a key that is not UTF-8, a null key, headers with binary, empty and null
 *       values), reads them back with a {@link KafkaConsumer} in GROUP, and hands each to Spring
 *       Kafka's {@link DeadLetterPublishingRecoverer} with a real {@link KafkaTemplate}, as a
 *       listener container would after its listener threw: plainly, in a Kafka transaction that
 *       commits, or in one that aborts. Prints the originals as consumed.</li>
 *   <li>{@code spring-container BOOTSTRAP TOPIC GROUP TAG}: the same records, consumed by a
 *       Spring {@link KafkaMessageListenerContainer} whose listener throws, with a
 *       {@link DefaultErrorHandler} that hands each failure to the recoverer at once (no
 *       retries): what a Spring application does. Prints the records the listener saw.</li>
 * </ul>
 */
public final class Probe {
    private static final Duration WAIT = Duration.ofSeconds(30);

    private Probe() {}

    public static void main(String[] args) throws Exception {
        if (args.length == 0) {
            usage();
        }
        switch (args[0]) {
            case "consume" -> {
                if (args.length != 4) usage();
                System.out.println(json(consume(args[1], args[2], args[3])));
            }
            case "spring-container" -> {
                if (args.length != 5) usage();
                System.out.println(json(springContainer(args[1], args[2], args[3], args[4])));
            }
            case "spring-dlt" -> {
                if (args.length != 6) usage();
                System.out.println(json(springDlt(args[1], args[2], args[3], args[4], args[5])));
            }
            default -> usage();
        }
    }

    private static void usage() {
        System.err.println("usage: Probe consume BOOTSTRAP TOPIC read_committed|read_uncommitted\n"
                + "       Probe spring-dlt BOOTSTRAP TOPIC GROUP plain|tx-commit|tx-abort TAG\n"
                + "       Probe spring-container BOOTSTRAP TOPIC GROUP TAG");
        System.exit(2);
    }

    /** Every record of every partition of {@code topic}, up to the end offsets seen at the start. */
    static List<ConsumerRecord<byte[], byte[]>> consume(String bootstrap, String topic, String isolation) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, isolation);
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        try (KafkaConsumer<byte[], byte[]> c =
                new KafkaConsumer<>(p, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
            List<TopicPartition> parts = c.partitionsFor(topic, WAIT).stream()
                    .map(i -> new TopicPartition(topic, i.partition()))
                    .collect(Collectors.toList());
            c.assign(parts);
            c.seekToBeginning(parts);
            // For read_committed these are the last stable offsets: aborted records and
            // transaction markers before them are skipped, never returned.
            Map<TopicPartition, Long> ends = c.endOffsets(parts, WAIT);
            List<ConsumerRecord<byte[], byte[]>> out = new ArrayList<>();
            long deadline = System.nanoTime() + WAIT.toNanos();
            while (parts.stream().anyMatch(tp -> c.position(tp, WAIT) < ends.get(tp))) {
                if (System.nanoTime() > deadline) {
                    throw new IllegalStateException("no progress reading " + topic + ": at "
                            + parts.stream().map(tp -> tp + "=" + c.position(tp)).collect(Collectors.joining(", "))
                            + ", ends " + ends);
                }
                for (ConsumerRecord<byte[], byte[]> r : c.poll(Duration.ofMillis(200))) {
                    if (r.offset() < ends.get(new TopicPartition(r.topic(), r.partition()))) {
                        out.add(r);
                    }
                }
            }
            return out;
        }
    }

    /** The originals as consumed, after each was dead-lettered by Spring. */
    static List<ConsumerRecord<byte[], byte[]>> springDlt(
            String bootstrap, String topic, String group, String mode, String tag) throws Exception {
        List<RecordMetadata> sent = produceOriginals(bootstrap, topic, tag);
        Map<String, Object> pc = producerConfig(bootstrap);

        // Read them back as a listener container's consumer would.
        Properties cp = new Properties();
        cp.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        cp.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        cp.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        List<ConsumerRecord<byte[], byte[]>> consumed = new ArrayList<>();
        try (KafkaConsumer<byte[], byte[]> consumer =
                new KafkaConsumer<>(cp, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
            List<TopicPartition> parts = List.of(new TopicPartition(topic, 0), new TopicPartition(topic, 1));
            consumer.assign(parts);
            for (TopicPartition tp : parts) {
                sent.stream().filter(m -> m.partition() == tp.partition())
                        .mapToLong(RecordMetadata::offset).min()
                        .ifPresent(o -> consumer.seek(tp, o));
            }
            long deadline = System.nanoTime() + WAIT.toNanos();
            while (consumed.size() < sent.size()) {
                if (System.nanoTime() > deadline) {
                    throw new IllegalStateException("read back " + consumed.size() + " of " + sent.size());
                }
                for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
                    if (sent.stream().anyMatch(s -> s.partition() == r.partition() && s.offset() == r.offset())) {
                        consumed.add(r);
                    }
                }
            }

            Map<String, Object> fc = new HashMap<>(pc);
            DefaultKafkaProducerFactory<byte[], byte[]> factory =
                    new DefaultKafkaProducerFactory<>(fc, new ByteArraySerializer(), new ByteArraySerializer());
            if (!mode.equals("plain")) {
                factory.setTransactionIdPrefix("sidetrack-interop-" + tag + "-");
            }
            try {
                KafkaTemplate<byte[], byte[]> template = new KafkaTemplate<>(factory);
                // Spring's default destination: TOPIC-dlt, same partition.
                DeadLetterPublishingRecoverer recoverer = new DeadLetterPublishingRecoverer(template);
                int[] n = {0};
                Runnable deadLetterAll = () -> {
                    for (ConsumerRecord<byte[], byte[]> r : consumed) {
                        n[0]++;
                        // What a listener container hands its error handler when the listener
                        // throws: the listener's exception wrapped, with the group id.
                        Exception e = new ListenerExecutionFailedException("Listener failed", group,
                                new IllegalStateException("declined #" + n[0] + " (" + tag + ")"));
                        recoverer.accept(r, consumer, e);
                    }
                };
                switch (mode) {
                    case "plain" -> deadLetterAll.run();
                    case "tx-commit" -> template.executeInTransaction(t -> {
                        deadLetterAll.run();
                        return null;
                    });
                    case "tx-abort" -> {
                        try {
                            template.executeInTransaction(t -> {
                                deadLetterAll.run();
                                throw new AbortOnPurpose();
                            });
                            throw new IllegalStateException("the transaction was not aborted");
                        } catch (AbortOnPurpose expected) {
                            // Rolled back: the records stay in the log, marked aborted.
                        }
                    }
                    default -> usage();
                }
            } finally {
                factory.destroy();
            }
        }
        return consumed;
    }

    private static Map<String, Object> producerConfig(String bootstrap) {
        Map<String, Object> pc = new HashMap<>();
        pc.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        pc.put(ProducerConfig.ACKS_CONFIG, "all");
        return pc;
    }

    /** The records that will fail: odd keys and headers, on partitions 0 and 1. */
    static List<RecordMetadata> produceOriginals(String bootstrap, String topic, String tag) throws Exception {
        List<ProducerRecord<byte[], byte[]>> originals = List.of(
                // A key that is not UTF-8 (0xff can never start a UTF-8 sequence), binary header.
                rec(topic, 0, new byte[] {(byte) 0xff, 0x00, (byte) 0xfe, 'k'},
                        utf8("{\"n\":1,\"tag\":\"" + tag + "\"}"),
                        new RecordHeader("trace", utf8("t-1")),
                        new RecordHeader("bin", new byte[] {0x00, (byte) 0xff, (byte) 0x80})),
                // A null key; an empty and a null header value; a value that is not JSON.
                rec(topic, 0, null, utf8(tag + ": null key"),
                        new RecordHeader("empty", new byte[0]), new RecordHeader("none", null)),
                // A plain key, a duplicate header name (order matters).
                rec(topic, 1, utf8("order-" + tag), utf8(tag + ": plain"),
                        new RecordHeader("dup", utf8("a")), new RecordHeader("dup", utf8("b"))));
        Map<String, Object> pc = producerConfig(bootstrap);
        List<RecordMetadata> sent = new ArrayList<>();
        try (KafkaProducer<byte[], byte[]> producer =
                new KafkaProducer<>(pc, new ByteArraySerializer(), new ByteArraySerializer())) {
            for (ProducerRecord<byte[], byte[]> r : originals) {
                sent.add(producer.send(r).get());
            }
        }

        return sent;
    }

    /** The records as a Spring listener container's listener saw them, each dead-lettered. */
    static List<ConsumerRecord<byte[], byte[]>> springContainer(
            String bootstrap, String topic, String group, String tag) throws Exception {
        List<RecordMetadata> sent = produceOriginals(bootstrap, topic, tag);
        Map<String, Object> cc = new HashMap<>();
        cc.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        cc.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        DefaultKafkaConsumerFactory<byte[], byte[]> consumers =
                new DefaultKafkaConsumerFactory<>(cc, new ByteArrayDeserializer(), new ByteArrayDeserializer());
        DefaultKafkaProducerFactory<byte[], byte[]> producers = new DefaultKafkaProducerFactory<>(
                producerConfig(bootstrap), new ByteArraySerializer(), new ByteArraySerializer());
        List<ConsumerRecord<byte[], byte[]>> seen = Collections.synchronizedList(new ArrayList<>());
        AtomicInteger recovered = new AtomicInteger();
        ContainerProperties props = new ContainerProperties(topic);
        props.setGroupId(group);
        props.setMessageListener((MessageListener<byte[], byte[]>) r -> {
            seen.add(r);
            throw new IllegalStateException("declined #" + seen.size() + " (" + tag + ")");
        });
        KafkaMessageListenerContainer<byte[], byte[]> container =
                new KafkaMessageListenerContainer<>(consumers, props);
        DefaultErrorHandler handler = new DefaultErrorHandler(
                new DeadLetterPublishingRecoverer(new KafkaTemplate<>(producers)), new FixedBackOff(0L, 0L));
        handler.setRetryListeners(new RetryListener() {
            @Override
            public void failedDelivery(ConsumerRecord<?, ?> record, Exception ex, int attempt) {}

            @Override
            public void recovered(ConsumerRecord<?, ?> record, Exception ex) {
                recovered.incrementAndGet();
            }
        });
        container.setCommonErrorHandler(handler);
        container.start();
        try {
            long deadline = System.nanoTime() + WAIT.toNanos();
            while (recovered.get() < sent.size()) {
                if (System.nanoTime() > deadline) {
                    throw new IllegalStateException("dead-lettered " + recovered.get() + " of " + sent.size());
                }
                Thread.sleep(50);
            }
        } finally {
            container.stop();
            producers.destroy();
        }
        return new ArrayList<>(seen);
    }

    private static final class AbortOnPurpose extends RuntimeException {
        AbortOnPurpose() {
            super("aborted on purpose by the interop probe");
        }
    }

    private static ProducerRecord<byte[], byte[]> rec(
            String topic, int partition, byte[] key, byte[] value, Header... headers) {
        return new ProducerRecord<byte[], byte[]>(topic, partition, key, value, List.of(headers));
    }

    private static byte[] utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    private static String hex(byte[] b) {
        if (b == null) {
            return "null";
        }
        StringBuilder s = new StringBuilder("\"");
        for (byte x : b) {
            s.append(Character.forDigit((x >> 4) & 0xf, 16)).append(Character.forDigit(x & 0xf, 16));
        }
        return s.append('"').toString();
    }

    /** JSON text of a Java string (header names are Java strings). */
    private static String str(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    private static String json(List<ConsumerRecord<byte[], byte[]>> records) {
        StringBuilder s = new StringBuilder("[");
        for (int i = 0; i < records.size(); i++) {
            ConsumerRecord<byte[], byte[]> r = records.get(i);
            if (i > 0) s.append(",\n ");
            s.append("{\"topic\":").append(str(r.topic()))
                    .append(",\"partition\":").append(r.partition())
                    .append(",\"offset\":").append(r.offset())
                    .append(",\"timestamp\":").append(r.timestamp())
                    .append(",\"timestamp_type\":").append(str(r.timestampType().toString()))
                    .append(",\"key\":").append(hex(r.key()))
                    .append(",\"value\":").append(hex(r.value()))
                    .append(",\"headers\":[");
            Header[] hs = r.headers().toArray();
            for (int j = 0; j < hs.length; j++) {
                if (j > 0) s.append(',');
                s.append('[').append(str(hs[j].key())).append(',').append(hex(hs[j].value())).append(']');
            }
            s.append("]}");
        }
        return s.append("]").toString();
    }
}
